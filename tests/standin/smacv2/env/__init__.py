from smacv2.env.starcraft2.starcraft2 import StarCraft2Env
from smacv2.env.starcraft2.wrapper import StarCraftCapabilityEnvWrapper

__all__ = ["StarCraft2Env", "StarCraftCapabilityEnvWrapper"]

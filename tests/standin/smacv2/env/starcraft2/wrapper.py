from sc2_standin import StarCraftCapabilityEnvWrapper

__all__ = ["StarCraftCapabilityEnvWrapper"]

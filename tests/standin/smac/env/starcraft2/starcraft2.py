from sc2_standin import StarCraft2Env

__all__ = ["StarCraft2Env"]

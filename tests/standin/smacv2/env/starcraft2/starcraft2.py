from sc2_standin import CannotResetException, StarCraft2Env

__all__ = ["CannotResetException", "StarCraft2Env"]

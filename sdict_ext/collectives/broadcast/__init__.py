"""broadcast_state_dict: rank 0's full state dict onto every rank."""

from sdict_ext.collectives.broadcast.main import broadcast_state_dict

__all__ = ["broadcast_state_dict"]

"""Coalesced collectives over whole state dicts: agreement, buckets, DTensor boxes,
and the gather / distribute / broadcast of torch.distributed._state_dict_utils."""

"""``afterwrite bench`` (from a checkout): the figures in the README, measured on this machine."""

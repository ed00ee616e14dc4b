"""The spill journal: what Redis could not take, kept on local disk and replayed later."""

"""``chatloop plan`` and ``chatloop bench-host``: from a list of machines to layer ranges, replicas and configs."""

"""``tally bench``: the service's performance, measured against its own baselines."""

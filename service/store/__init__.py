"""Redis-side state: the key layout (`keys`), the event contract shared with the nightly job
(`events`) and the per-user histories (`history`).
"""

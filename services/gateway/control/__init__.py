"""Keys, authentication, rate limits, budgets and metering: who may run what, and at what cost.

`keys` (API keys) and `auth` (token -> principal, scopes); `store` (the ControlStore protocol and
the values it answers) with its two implementations, `local_store` (in process) and `redis_store`
(shared by replicas: `redis_scripts`, `redis_steps`); `windows` and `budgets` (the arithmetic both
share); `metering` (admission and accounting per request); `plane` (the whole, from settings).
"""

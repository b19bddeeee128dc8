"""Keys, authentication, rate limits, budgets and metering: who may run what, and at what cost."""

"""The revisions, oldest first: 0001 the usage table as releases before migrations made it, 0002
exact cost and one row per request id."""

"""Model tooling for the `meshserve models` command, not a service: the builders that train the
catalog's `source: {kind: build}` models and the build step that materializes catalog entries in
the store. Only the launcher (services/cli.py) imports this package; the services read the store
through services.common.modelstore."""

"""What every meshserve service shares: settings, server bootstrap, telemetry, errors, catalog."""

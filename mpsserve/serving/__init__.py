"""Ray Serve glue: deployments and the app builder. Logic lives in the modules they call."""

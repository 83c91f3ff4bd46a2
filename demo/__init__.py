"""A local Prefect stack (server, workers, seeded runs) for the demo and the integration tests."""

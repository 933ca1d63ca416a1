"""The jobs: each owns its run protocol (validate -> train -> record -> publish -> register, the
lock, the gates) and is a plain function the CLI, the demo and schedulers call."""

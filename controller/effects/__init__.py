"""I/O through the drivers: observe, the reconcile Session, apply, health, recovery, the watch loop.

Imports `controller.core`, `controller.drivers`, `solver`, `specs` and other effects — never the commands."""

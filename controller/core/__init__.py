"""The pure core: spec + placement → desired state → diff → plan. No I/O, no clock, no network.

Imports only `controller.core.*`, `solver` and `specs`."""

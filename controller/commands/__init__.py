"""The `homelab` commands: parse options, call the effects, print. One module per command, no engine logic."""

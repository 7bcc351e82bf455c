"""Harnesses around a node: the benchmark, the DKIM signing benchmark, the demo, the recording
sink and the kill test.
The product never imports them (tests/test_layers.py); only the `postlane` command does."""

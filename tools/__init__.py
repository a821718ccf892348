"""Test and tooling code outside the installed package: the exchange replay server."""

"""Probes and experiments that answered their question; kept runnable (`python -m benchmarks.experiments.<name>`)
so that their results in benchmarks/results/ (most in its archive/) can be reproduced."""

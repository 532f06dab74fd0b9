"""The end of the road a run's data walks: what its tests printed, read (ktap.py), compared with the failures it
expects (known.py) and told: results.json, results.xml (junit.py), the terminal, GitHub's summary (results.py)."""

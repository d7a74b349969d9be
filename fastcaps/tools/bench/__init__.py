"""``fastcaps bench``: engine.py times and weighs (workers, allocator, peak memory), report.py
turns results into ratios, a table and JSON, charts.py draws them, command.py is the CLI."""

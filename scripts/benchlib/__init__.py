"""scripts/bench, by job:

  phases.py    the loads (Phase) and the --only parts that run them: one definition
  targets.py   the table of targets, what each needs, how its figure is judged
  runner.py    Bench: runs the loads and records what they measured
  services.py  the bench bot, a private Apache, wrk
  sampling.py  CPU, memory and sockets from /proc
  report.py    the Markdown report
  selftest.py  --self-test: targets, loads and report checked with made-up figures
  cli.py       arguments and the run
"""

"""Imported last by the fork server's preload: warms it up for the runs it forks.

Importing this module is the one way to run code in a ``multiprocessing`` fork server
before it forks; nothing else imports it.
"""

from runners_orchestrator.run_process import warm_up

warm_up()

"""Imported first by the fork server (launcher.PRELOAD), and by nothing else: it makes that
process ignore SIGTERM, which its workers then inherit.

A SIGTERM to the server's whole process group (systemd's default stop, `pdserve up`'s) also
reaches the fork server; killed, it took every worker with it (each dies with its parent),
and the front end's drain of the requests in flight had nothing left to drain. The front end
stops the fork server itself (SIGKILL, `launcher.stop_fork_server`), and the fork server
exits by itself once the front end is gone."""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)

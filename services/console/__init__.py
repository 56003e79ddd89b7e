"""The console: a live web page of the running system, built on its Prometheus metrics.

:mod:`.series` scrapes the services' ``/metrics`` endpoints every few seconds
and keeps a bounded history in memory; :mod:`.page` renders it as server-side
SVG charts and tables; :mod:`.app` serves the page, its data as JSON, behind
the same bearer-token mechanism as the other APIs (:mod:`services.common.http`).
"""

"""The SES-compatible management API: SES v2 REST-JSON and SES v1 Query/XML on one listener.

Pure parts: `sigv4` (request verification), `errors` (SES error codes per protocol), `v1`/`v2` (request
parsing, response shaping); `server` is the aiohttp shell. Every operation calls relay/sets.py, the same
functions as `relay config-set/tracking/destination`, so the API and the CLI share one store.
"""

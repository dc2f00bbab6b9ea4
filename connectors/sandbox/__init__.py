"""Real HTTP(S) simulators of the vendor APIs, for tests, benchmarks and ``syncd demo``.

Each simulator is a small Flask app over in-memory state, served by a threaded
werkzeug server on 127.0.0.1 (HTTPS with a throwaway trustme CA where the real
API is HTTPS-only). They log every request and can inject faults, so tests
assert on what crossed the wire.
"""

"""Serve-independent logic of the HTTP service: keys, rate limits, input parsing, envelopes, streams.

Nothing here imports Ray, so it is unit-tested without a cluster and reused by the client.
"""

"""`tokenmill gateway`: the request layer in front of tokenmill replicas and external APIs.

Keys, limits, admission queue, routing, upstream pools, proxy and usage ledger;
`docs/gateway.md` describes each and the path of a request.
"""

"""Data node: storage engines, the record store and the internal protocol server."""

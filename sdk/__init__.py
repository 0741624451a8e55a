"""Shared by silo agents and the aggregator: AMoLE layer, strategies, math, data, wire."""

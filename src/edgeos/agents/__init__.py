"""Agents: durable sense → reason → act → learn loops under a supervisor."""

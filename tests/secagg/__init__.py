"""Tests of fedguard.secagg."""

"""Run reports: tables and plots people would rather look at than read."""

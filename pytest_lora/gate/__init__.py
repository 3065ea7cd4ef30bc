"""The regression gate: rules, the comparison with a baseline, its statistics, its verdict, the confirming rerun."""

"""Evaluation: metrics people know (scikit-learn), plots (matplotlib), one self-contained HTML report."""

"""Demo data and models built by edgeos' own code: a retail simulator and stockout classifiers."""

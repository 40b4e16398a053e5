"""Tools for running guest kernels in CI: KTAP parsing, KUnit reports, exit budgets."""

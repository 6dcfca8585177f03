"""Programs the `coding` reward ships into its sandbox as files (standard library only, never imported by the
reward itself): the judge that runs the tests and decides verdicts, the server that runs the solution and exports
its functions, and the plain-data wire format between them."""

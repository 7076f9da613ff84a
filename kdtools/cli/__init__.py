"""One thin typer module per command. Each parses flags, opens inputs, calls one library
function and writes outputs; all the work lives in the library."""

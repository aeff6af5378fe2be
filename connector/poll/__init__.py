"""One poll of one account: its phases, from the listing to the QUIT."""

"""`voxscale simulate`: replay traffic through the operator's own scaling engine and price the result."""

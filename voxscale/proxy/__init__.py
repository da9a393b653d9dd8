"""The door sidecar (`voxscale proxy`): a reverse proxy in the pod, in front of any HTTP TTS server.

`core` is the pure admission and accounting logic, `settings` the VOXSCALE_PROXY_* variables (pure
data, so the operator can read them without aiohttp), `app` the asyncio/HTTP shell around them.
"""

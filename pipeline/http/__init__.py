"""The download actor's HTTP layer: libcurl (through pycurl) on one network thread per actor.

`curl_loop.CurlLoop` drives a libcurl multi handle with epoll; `exchange.Exchange` is one HTTP
request on a libcurl easy handle (options, header and body callbacks, the size cap, libcurl's
errors as reason codes); `proxies.ProxySettings` reads the standard proxy variables once.
`pipeline.fetch.Fetcher` builds the rules on top (address guard, redirects hop by hop, retries,
one deadline per attempt, per-host connection limit).
"""

"""Security building blocks: a local CA and component certificates (``ca``), TLS credentials for gRPC, aiohttp and
asyncio streams (``tls``), caller identity and the per-method role table (``identity``, ``authz``), capability and
transfer tokens and leader-term fencing (``tokens``, ``fencing``), API keys (``apikeys``), a local cluster's
throwaway security set-up (``bootstrap``) and the client context file (``context``).
"""

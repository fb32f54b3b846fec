"""The frontend: owns a request from arrival to last token (OpenAI HTTP + gRPC Generate, output sink, dispatch).

core.Frontend is the one object both surfaces use; service.start_grpc and http.start_http serve it;
main.frontend_command is ``llumnix frontend``.
"""

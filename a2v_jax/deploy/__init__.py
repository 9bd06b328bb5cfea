"""Deployment outside the simulation: one node's program, the server's program, and their transports.

  node.py         NodeProgram: one node's rows and the engine's single-client programs
  server.py       ServerProgram: the engine's sampling, aggregation and server step on nodes' replies
  run.py          run_deployment: the rounds (the trainer's round loop) through a transport; LocalTransport
  flower_app.py   the Flower ClientApp / ServerApp (optional extra [flower])
"""

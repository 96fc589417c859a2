import socket

# Create a UDP socket
client_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

# Bind the socket to the port
server_address = '127.0.0.1'
server_port = 10001

# Buffer size
buffer_size = 4096

numbers = [7, -12, 1.5, 123456789012345678901234567890]

try:
    for number in numbers:
        message = str(number)

        # Send data
        client_socket.sendto(message.encode(), (server_address, server_port))
        print('Sent to server: ', message)

        # Receive response
        print('Waiting for response...')
        data, server = client_socket.recvfrom(buffer_size)
        print('Received square from server: ', data.decode())

finally:
    client_socket.close()
    print('Socket closed')

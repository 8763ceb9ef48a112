/*
 * LD_PRELOAD shim: bind Orthanc's DICOM port to one address.
 *
 * Orthanc 1.10 (dcmtk 3.6.7 underneath) has no option for the address of its DICOM server: it
 * always binds the wildcard address. sci-node's stack (sci_node/app/stack_dicom.py) compiles this
 * file and preloads it into Orthanc with
 *
 *   SCI_NODE_BIND_PORT=<Orthanc's DicomPort>  SCI_NODE_BIND_ADDR=<IPv4 address, e.g. 127.0.0.1>
 *
 * A bind() of an IPv4 socket to the wildcard address on exactly that port is turned into a
 * bind() to SCI_NODE_BIND_ADDR. Every other bind() (Orthanc's HTTP server, outgoing sockets)
 * is passed through unchanged. The stack checks /proc/net/tcp afterwards, so a shim that did
 * not take effect stops the stack instead of leaving the port open.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    static bind_fn real_bind = NULL;
    if (real_bind == NULL)
        real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    const char *port = getenv("SCI_NODE_BIND_PORT");
    const char *host = getenv("SCI_NODE_BIND_ADDR");
    if (port != NULL && host != NULL && addr != NULL && addr->sa_family == AF_INET
        && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in in;
        memcpy(&in, addr, sizeof in);
        if (ntohs(in.sin_port) == (unsigned short)atoi(port) && in.sin_addr.s_addr == htonl(INADDR_ANY)
            && inet_pton(AF_INET, host, &in.sin_addr) == 1)
            return real_bind(fd, (const struct sockaddr *)&in, sizeof in);
    }
    return real_bind(fd, addr, len);
}

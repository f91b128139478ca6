// Consume a token from refresher in Java (11 or later), standard library only: read the
// token file (format raw), report the token rejected (as after an HTTP 401), and reload
// the file when it changes until it holds the fresh token the daemon answered with.
//
//   java TokenConsumer.java TOKEN_FILE JOB [TENANT] [DAEMON_URL]
//
// Sends $REFRESHER_CONSUMER_TOKEN as the bearer secret when it is set.

import java.io.IOException;
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardWatchEventKinds;
import java.nio.file.WatchKey;
import java.nio.file.WatchService;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.time.Duration;
import java.util.concurrent.TimeUnit;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

public final class TokenConsumer {
    private static final Pattern FINGERPRINT = Pattern.compile("\"fingerprint\"\\s*:\\s*\"([0-9a-f]{12})\"");

    /** The daemon says the partner rejected a fresh token too (409): stop calling. */
    static final class LinkInvalidException extends Exception {
        LinkInvalidException(String message) {
            super(message);
        }
    }

    /** The whole file at once: refresher replaces it by rename, never in place. */
    static String readToken(Path file) throws IOException {
        return Files.readString(file, StandardCharsets.US_ASCII).strip();
    }

    /** The first 12 hex digits of the token's SHA-256: how the daemon names a token. */
    static String fingerprint(String token) throws NoSuchAlgorithmException {
        byte[] digest = MessageDigest.getInstance("SHA-256").digest(token.getBytes(StandardCharsets.US_ASCII));
        StringBuilder hex = new StringBuilder();
        for (int i = 0; i < 6; i++) {
            hex.append(String.format("%02x", digest[i]));
        }
        return hex.toString();
    }

    /** Changes at every rewrite: each one renames a new file (a new inode) into place. */
    static String stamp(Path file) {
        try {
            return Files.getAttribute(file, "unix:ino") + " " + Files.getLastModifiedTime(file).toMillis();
        } catch (IOException | UnsupportedOperationException e) {
            return "gone";
        }
    }

    /** POST /v1/tokens/{job}/refresh?rejected=FP[&tenant=T]; the fresh token's fingerprint. */
    static String reportRejected(String daemon, String job, String tenant, String token) throws Exception {
        String query = "rejected=" + fingerprint(token);
        if (!tenant.isEmpty()) {
            query += "&tenant=" + URLEncoder.encode(tenant, StandardCharsets.UTF_8);
        }
        String encodedJob = URLEncoder.encode(job, StandardCharsets.UTF_8);
        HttpRequest.Builder request = HttpRequest.newBuilder(URI.create(daemon + "/v1/tokens/" + encodedJob + "/refresh?" + query))
                .POST(HttpRequest.BodyPublishers.noBody())
                .timeout(Duration.ofSeconds(30));
        String secret = System.getenv("REFRESHER_CONSUMER_TOKEN");
        if (secret != null && !secret.isEmpty()) {
            request.header("Authorization", "Bearer " + secret);
        }
        HttpResponse<String> response = HttpClient.newHttpClient().send(request.build(), HttpResponse.BodyHandlers.ofString());
        if (response.statusCode() == 409) {
            throw new LinkInvalidException(job + " " + tenant + ": the link is invalid");
        }
        if (response.statusCode() != 200) {
            throw new IOException("report failed: HTTP " + response.statusCode());
        }
        Matcher found = FINGERPRINT.matcher(response.body());
        if (!found.find()) {
            throw new IOException("no fingerprint in the daemon's answer");
        }
        return found.group(1);
    }

    /**
     * Waits until the file holds the token `wanted` names. The watch (WatchService:
     * inotify on Linux) is on the directory, because refresher renames a new file over
     * the old one; it also wakes every 0.2 s, for file systems that send no events.
     */
    static void waitFor(Path file, String wanted, long timeoutMillis) throws Exception {
        Path directory = file.toAbsolutePath().getParent();
        try (WatchService watcher = directory.getFileSystem().newWatchService()) {
            directory.register(watcher, StandardWatchEventKinds.ENTRY_CREATE, StandardWatchEventKinds.ENTRY_MODIFY);
            long deadline = System.currentTimeMillis() + timeoutMillis;
            String last = "";
            while (System.currentTimeMillis() < deadline) {
                String now = stamp(file);
                if (!now.equals(last)) {
                    last = now;
                    if (Files.exists(file) && fingerprint(readToken(file)).equals(wanted)) {
                        return;
                    }
                }
                WatchKey key = watcher.poll(200, TimeUnit.MILLISECONDS);
                if (key != null) {
                    key.pollEvents();
                    key.reset();
                }
            }
        }
        throw new IOException("the file never held " + wanted);
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: TokenConsumer TOKEN_FILE JOB [TENANT] [DAEMON_URL]");
            System.exit(2);
        }
        Path file = Path.of(args[0]);
        String tenant = args.length > 2 ? args[2] : "";
        String daemon = args.length > 3 ? args[3] : "http://127.0.0.1:9464";
        String token = readToken(file);
        System.out.println("token " + fingerprint(token));
        try {
            String fresh = reportRejected(daemon, args[1], tenant, token);
            System.out.println("answer " + fresh);
            waitFor(file, fresh, 30_000);
            System.out.println("reloaded " + fresh);
        } catch (LinkInvalidException e) {
            System.err.println(e.getMessage());
            System.exit(3);
        }
    }
}
